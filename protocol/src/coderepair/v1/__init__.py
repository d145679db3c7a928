"""Generated gRPC stubs of the coderepair contract. Do not edit: run `make proto`."""
