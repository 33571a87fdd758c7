"""Training the student on what was bought: the one ``loop`` every method's stages run through,
the pretrained ``students``, the prediction ``heads``, batch ``augment``ation on uint8 tensors,
the default ``recipe``, and the distillation ``methods`` by name."""
