"""The trainer: model, attention mask, action head, losses, loop, inference."""
