"""Operator tools: prices and cost, the poison queue, enqueue."""
