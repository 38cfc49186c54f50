"""The recipe of the embedded tiny MoE: corpus, tokenizer, training and evaluation."""
