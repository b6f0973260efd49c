"""The Gram cache: its strict manifest, zarr or safetensors storage of packed triangles, and shard sums."""
