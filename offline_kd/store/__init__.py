"""The signal store: its Zarr v3 schema, store URLs and filesystems, the one-writer-per-rank lease, stored hidden-state dtypes."""
