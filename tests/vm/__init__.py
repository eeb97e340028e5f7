"""The AF_VSOCK suite that runs inside the micro-VM guest (scripts/vm-tests); skipped elsewhere."""
