"""The contract between coderepair's parties.

Submodules are imported explicitly (``from coderepair.protocol import identity``);
this package stays cheap to import so that console scripts answer ``--help`` fast.
"""

from coderepair.protocol.errors import ProtocolError

__all__ = ["ProtocolError", "__version__"]

__version__ = "0.1.0"
