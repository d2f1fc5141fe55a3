"""Small file helpers shared by every layer, the phone included (standard library + numpy):
atomic writes and safetensors."""
