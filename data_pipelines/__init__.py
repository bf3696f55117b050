"""Offline tools that build and check WebDataset shards (omni-data); see the data issue."""
