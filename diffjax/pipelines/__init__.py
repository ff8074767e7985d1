"""The pipelines that use models: sampling (`diffjax.sample`), training and evaluation."""
