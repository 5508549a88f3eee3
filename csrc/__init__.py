"""The compiled windowed-attention kernels (C++, CUDA) and ops.py, which builds them and registers them as torch ops."""
