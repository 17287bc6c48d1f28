"""A second tool set for the synthetic tool task (experiments/tool_chats.py --task ledger): the tools a
LoRA base model is trained with, so that LoRA has new tools (atlas.py's) to learn."""

from atlas import CAPITALS

# Invented currencies for atlas.py's invented countries.
CURRENCIES = dict(zip(CAPITALS, ["dram", "pelt", "sovet", "krone", "marl", "dinar", "florin", "real", "zloty",
                                 "rand", "lira", "peso", "kuna", "lev", "tolar", "rupe", "dobra", "birr", "lek",
                                 "som"]))


def subtract(a: int, b: int) -> int:
    """Subtracts b from a."""
    return a - b


def currency(country: str) -> str:
    """The currency of a country."""
    if country not in CURRENCIES:
        raise KeyError(f"no country named {country!r}")
    return CURRENCIES[country]


TOOLS = [subtract, currency]
