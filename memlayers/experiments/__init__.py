"""Packaged experiments (`memlayers experiment NAME`): utilisation (sub-key collapse and its remedies),
continual (learning new facts without forgetting: sparse memory finetuning against full finetuning and LoRA)."""
