"""Model core: BiT layers (`layers`), the functional model (`bit`), the zoo (`zoo`), official checkpoints
(`checkpoint`, `download`) and the resolver from what a user names to a model (`resolve`)."""
