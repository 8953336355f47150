"""The moderation benchmark's corpus: clean texts in several languages, disguises, PII cases.

Written for this benchmark (no text copied from elsewhere); every PII value
is made up (test card numbers, documentation phone ranges, example domains).
"""
