"""Named registries: the one way gin names pick an implementation (a reward, a metric, a
selection method, an evolver, a filter), with one error for a name that is not there."""

from __future__ import annotations

from typing import Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
  """name -> object, for one kind of thing (`what`, used in error messages).

      METRICS = Registry("informativeness metric")

      @METRICS.register("reward_gap")
      def reward_gap(rewards): ...

      METRICS.get("reward_gap")  # ValueError listing the known names for an unknown one
  """

  def __init__(self, what: str):
    self.what = what
    self._items: dict[str, T] = {}

  def register(self, name: str, obj: T | None = None, *, overwrite: bool = False):
    """Registers `obj` under `name`; without `obj`, returns a decorator."""
    def add(o: T) -> T:
      if not overwrite and name in self._items and self._items[name] is not o:
        raise ValueError(f"A {self.what} named {name!r} is already registered; pick another "
                         "name or pass overwrite=True.")
      self._items[name] = o
      return o
    return add if obj is None else add(obj)

  def get(self, name: str) -> T:
    if not isinstance(name, str) or name not in self._items:
      raise ValueError(f"Unknown {self.what} {name!r}; known: {', '.join(self.names())}.")
    return self._items[name]

  def names(self) -> list[str]:
    return sorted(self._items)

  def __contains__(self, name: object) -> bool:
    return name in self._items

  def __iter__(self) -> Iterator[str]:
    return iter(self.names())

  def __len__(self) -> int:
    return len(self._items)

