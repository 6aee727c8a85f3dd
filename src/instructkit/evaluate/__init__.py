"""Evaluation of responses: offline metrics, the LLM judge, statistics and the report."""
