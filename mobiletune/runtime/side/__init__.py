"""Server-assisted side-tuning on the phone: the frozen backbone runs forward only, its
hidden states are quantized and streamed to a server that trains a side network
(``mobiletune.side``); the phone never runs a backward pass. ``config`` (the recipe's
``side=`` section), ``quantize`` (what crosses the link), ``protocol`` (the HTTP contract
both ends import), ``client`` (the phone's uploader), ``trainer`` (the phone's loop)."""
