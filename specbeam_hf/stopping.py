"""HF stopping criteria over the core's rows, judged once per step rather than once per token.

HF's loop calls its criteria once per step on the whole ``[batch, length]`` batch. The core appends a
row's tokens one by one and asks the row's ``stop`` callback after each, so a batch of ``R`` rows
that each append ``k`` tokens would call every criterion ``R·k`` times a step (about 0.2 ms a call
for a ``StopStringCriteria`` on this CPU, whatever the batch size). :class:`StepStops` is the rows'
``batch_stop``: before a step's tokens are appended it judges every (row, token) the row-wise
criteria will be asked about in one call per criterion, and the rows' ``stop`` callbacks answer from
that. The other criteria (custom ones, which may read the whole batch or its scores) are still called
token by token on the batch HF would give them.
"""

from __future__ import annotations

import torch
from transformers.generation.stopping_criteria import MaxTimeCriteria, StopStringCriteria

from specbeam_core import Request

# HF's criteria whose answer for a row depends on that row's tokens alone and on no scores (by exact
# type: a subclass may look across rows)
ROW_WISE_CRITERIA = (StopStringCriteria, MaxTimeCriteria)


class StepStops:
    """``batch_stop`` shared by the rows of one ``generate`` call: :meth:`__call__` judges a step's
    candidates, :meth:`hit` answers a row's ``stop`` callback from them (or judges that one row when
    it was not among them)."""

    def __init__(self, criteria: list, input_ids: torch.Tensor) -> None:
        self.criteria = list(criteria)
        self.rows = [row.tolist() for row in input_ids]  # what HF's criteria see before the new tokens
        self.device = input_ids.device
        self.prompt_lens: dict[int, int] = {}  # request_id -> the unpadded prompt's length
        self.row_of: dict[int, int] = {}  # request_id -> batch row
        self.judged: dict[tuple[int, int], bool] = {}  # (request_id, tokens so far) -> a criterion fired

    def add(self, request: Request, row: int) -> None:
        self.prompt_lens[request.request_id] = len(request.prompt)
        self.row_of[request.request_id] = row

    def _ids(self, request_id: int, tokens: list[int]) -> list[int]:
        """The row as HF's loop holds it: its padded input, then the new tokens."""
        return self.rows[self.row_of[request_id]] + tokens[self.prompt_lens[request_id] :]

    def __call__(self, rows: list[tuple[Request, list[int]]]) -> None:
        """Judge, for each row, every token of ``rows`` that its ``stop`` will be asked about: those
        before its first EOS, within its token budget."""
        self.judged.clear()
        keys: list[tuple[int, int]] = []
        sequences: list[list[int]] = []
        for request, tokens in rows:
            ids = self._ids(request.request_id, request.tokens)
            for j, token in enumerate(tokens[: request.remaining]):
                if token in request.eos_token_ids:
                    break
                ids = ids + [token]
                keys.append((request.request_id, len(request.tokens) + j + 1))
                sequences.append(ids)
        if not keys:
            return
        hits = torch.zeros(len(keys), dtype=torch.bool)  # [candidates]
        for criterion in self.criteria:
            hits |= self._judge(criterion, sequences).cpu()
        self.judged.update(zip(keys, hits.tolist()))

    def _judge(self, criterion, sequences: list[list[int]]) -> torch.Tensor:
        if isinstance(criterion, StopStringCriteria):
            # it reads the last ``maximum_token_len`` tokens of a row, so rows of any length at least
            # that long stack into one call; a shorter row is judged whole, on its own
            width = criterion.maximum_token_len
            long = [i for i, ids in enumerate(sequences) if len(ids) >= width]
            hits = torch.zeros(len(sequences), dtype=torch.bool)  # [candidates]
            if long:
                tails = torch.tensor([sequences[i][-width:] for i in long], device=self.device)  # [long, width]
                hits[long] = criterion(tails, None).reshape(-1).cpu()
            for i in sorted(set(range(len(sequences))) - set(long)):
                hits[i] = bool(criterion(torch.tensor([sequences[i]], device=self.device), None).reshape(-1)[0])
            return hits
        # MaxTimeCriteria: the same answer for every row
        one = criterion(torch.tensor([sequences[0]], device=self.device), None).reshape(-1)[0]
        return one.cpu().expand(len(sequences)).clone()

    def hit(self, request: Request, tokens: list[int]) -> bool:
        """Whether a criterion fires for ``request`` once it holds ``tokens``."""
        key = (request.request_id, len(tokens))
        if key not in self.judged:  # not among the step's candidates (a caller's own appends)
            ids = torch.tensor([self._ids(request.request_id, tokens)], device=self.device)  # [1, L]
            self.judged[key] = any(bool(c(ids, None).reshape(-1)[0]) for c in self.criteria)
        return self.judged[key]
