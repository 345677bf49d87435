"""GPT-assisted instruction data (LLaVA paper §3): symbolic image contexts, teacher prompts, response parsing."""
