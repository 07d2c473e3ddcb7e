"""`custom_dataset` hooks named by the YAML tasks in this folder (lm-eval loads this file by path)."""

from pruning_core.evaltasks import dataset


def next_sentence(**_):
    return dataset("pydoc_next_sentence")


def last_word(**_):
    return dataset("pydoc_last_word")


def rolling(**_):
    return dataset("pydoc_rolling")


def pkgdocs_last_word(**_):
    return dataset("pkgdocs_last_word")
