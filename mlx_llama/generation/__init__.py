"""From logits to text: sampling, the prefill/decode loop, stop strings, and on-disk prompt caches."""
