"""llava-ray: LLaVA (Visual Instruction Tuning) as distributed software on Ray."""

__version__ = "0.1.0"
