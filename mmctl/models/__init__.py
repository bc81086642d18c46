"""Model architectures: the decoder LM (`config`, `transformer`) and safetensors checkpoint dirs (`hf`)."""
