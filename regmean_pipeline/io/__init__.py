"""Model and tensor IO: lazy weights, safetensors reading and streaming writing, folders local or remote, atomic publish."""
