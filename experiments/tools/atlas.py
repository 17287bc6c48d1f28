"""The tools of the synthetic tool-use task (experiments/tool_chats.py): `--tools experiments/tools/atlas.py`."""

# Invented places, so nothing but the tool can know the answers.
CAPITALS = {
    "Arvenia": "Tolmek", "Borsica": "Quenby", "Caldoria": "Virel", "Dunmarra": "Ospet", "Elvania": "Kastro",
    "Fennia": "Lurvik", "Galdor": "Mirrow", "Hestria": "Pandel", "Istova": "Rukan", "Jorvala": "Sedrin",
    "Kelmora": "Tavish", "Lurania": "Umbrel", "Morvesk": "Valdin", "Nystra": "Wexford", "Orvania": "Yarrow",
    "Pelloria": "Zandor", "Quellia": "Abrin", "Rostavia": "Belvar", "Sorvania": "Cindral", "Tarquinia": "Dovesk",
}


def add(a: int, b: int) -> int:
    """Adds two whole numbers."""
    return a + b


def lookup(key: str) -> str:
    """The capital city of a country."""
    if key not in CAPITALS:
        raise KeyError(f"no country named {key!r}")
    return CAPITALS[key]


TOOLS = [add, lookup]
