"""Ray Serve application for llava-ray: OpenAI-compatible chat API with images."""
