"""The repair-task corpus: HumanEval mutants, repository tasks, prompts, the builder."""
