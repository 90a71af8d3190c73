"""The one exception type users catch for bad PEFT input."""


class PeftError(ValueError):
    """A PEFT configuration or operation that cannot be carried out.

    Raised before anything is changed: a model that saw a ``PeftError`` is
    exactly as it was before the call.
    """
