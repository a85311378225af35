"""Network parts shared by methods: layers, losses, discriminators, the semantic teacher, state-dict reading."""
