"""IEC 62608-2 cloud servers run by an operator for many homes (docs/cloud.md)."""
