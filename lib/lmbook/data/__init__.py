"""Readers of the project's data files (facts, tasks, corpora, instructions), each checking its
schema and naming the parameter, file and line of a bad record. Uses only the core."""
