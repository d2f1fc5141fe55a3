"""SplitLoRA's phone half: the wire contract (``protocol``) and the runner that trains the
first k blocks of a sharded bundle while a server trains the rest (``runner``)."""
