"""One collector for what is wrong with a request: every check adds to it, and the request is
refused once, naming every problem (field and message), or not at all."""

from __future__ import annotations

# How a problem names a request key that is the empty string, so every problem names a field.
EMPTY_KEY = '""'


class SpecError(ValueError):
    """A spec that cannot run; `errors` lists {"field", "message"} for every problem found."""

    def __init__(self, errors: list[dict[str, str]]):
        self.errors = errors
        super().__init__("; ".join(f"{e['field']}: {e['message']}" for e in errors))


class Problems:
    """The problems found so far. `where` prefixes every field (e.g. "base." in a sweep)."""

    def __init__(self, where: str = ""):
        self.where = where
        self.errors: list[dict[str, str]] = []

    def add(self, field: str, message: str) -> None:
        self.errors.append({"field": f"{self.where}{field or EMPTY_KEY}", "message": message})

    def __bool__(self) -> bool:
        return bool(self.errors)

    def __len__(self) -> int:
        return len(self.errors)

    def fields(self) -> set[str]:
        return {e["field"] for e in self.errors}

    def raise_if_any(self, error: type[SpecError] = SpecError) -> None:
        if self.errors:
            raise error(self.errors)
