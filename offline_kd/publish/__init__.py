"""A trained student out: `kd eval`, the save_pretrained export and its model card."""
