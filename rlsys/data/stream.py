"""The order in which a run sees its prompts: an endless, seeded stream over the examples."""
from __future__ import annotations

import random


class PromptStream:
    """Examples in epochs, each epoch a fresh permutation (when `shuffle`) drawn from
    `Random(seed + epoch)`, so the position (`epoch`, `index`) alone fixes everything that
    follows: a run restarted at that position sees exactly the same prompts.

    `take(n)` may cross an epoch boundary (the rest of one epoch, then the next one's start),
    so refill rounds and any `prompts_per_step` use every example once per epoch.
    """

    def __init__(self, examples: list, *, shuffle: bool, seed: int, epoch: int = 0, index: int = 0):
        if not examples:
            raise ValueError("no examples to stream")
        self.examples, self.shuffle, self.seed = list(examples), shuffle, seed
        self.epoch, self.index = epoch, index
        self._order = self._permutation(epoch)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(len(self.examples)))
        if self.shuffle:
            random.Random(self.seed + epoch).shuffle(order)
        return order

    def take(self, n: int) -> list:
        """The next `n` examples."""
        out = []
        while len(out) < n:
            if self.index >= len(self._order):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            k = min(n - len(out), len(self._order) - self.index)
            out += [self.examples[i] for i in self._order[self.index:self.index + k]]
            self.index += k
        return out

    def state(self) -> dict[str, int]:
        """Position in the stream (for checkpoints)."""
        return {"epoch": self.epoch, "index": self.index}
