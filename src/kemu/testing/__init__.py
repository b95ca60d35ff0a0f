"""Test harnesses that ship with kemu (used by its tests and benchmarks)."""
