"""The DVC stages, one thin CLI each (`python -m pipeline.<stage>`); what they share is in pipeline/common/, the
commands that are not stages in pipeline/commands/."""
