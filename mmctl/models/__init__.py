"""Model architectures: the decoder LM (`transformer`) and Hugging Face checkpoint interop (`hf`)."""
