"""One module per checkpoint file format. Each reader exposes `CheckpointReader`;
each writer computes a file's framing up front (`FileLayout`) so that the executor can
write every tensor's bytes at its final offset."""
