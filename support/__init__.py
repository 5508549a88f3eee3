"""What keeps SWARR safe and real, out of the reader's way. The story is in swarr.py and the scripts beside it;
each module here holds one concern and imports nothing above this folder."""
