"""Architecture search: candidate student shapes near a parameter budget (`space`), each pruned from the
same scores and distilled briefly in one set of processes (`run`); `minitron search` is its CLI."""
