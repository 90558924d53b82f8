"""What this VM is and what it can run: instance metadata, provisioning, GPUs, sizing."""
