"""The teacher pass that writes a store (`kd precompute`), its dry run, and `kd inspect` / `kd verify`."""
