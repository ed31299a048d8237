"""The offline toy world, the demo and the test bed: `world` builds (and caches) a character-level tokenizer,
a Llama teacher and a mismatched student; `tasks` are its synthetic task families with exact verifiers;
`source` is the toy world as one prompt source (it implements `trainer.data.source.PromptSource`).

May import: the data room (`trainer.data`), the rollout engines and the loop's leaves (`trainer.config`,
`trainer.models`). Nothing in the loop imports it: `trainer.run` picks the source by name.
"""
