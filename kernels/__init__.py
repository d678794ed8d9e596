"""Loss kernels (installed as `offline_kd.kernels`)."""
