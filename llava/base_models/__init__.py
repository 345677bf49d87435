"""Pretrained tiny base models built offline: a contrastive tiny CLIP and a text-pretrained tiny Llama.

LLaVA starts from a pretrained vision encoder and a pretrained LLM; these stand in for openai/clip-vit-* and
lmsys/vicuna-* in the demo (llava.tiny_models keeps the random ones for unit tests). See build.py.
"""
