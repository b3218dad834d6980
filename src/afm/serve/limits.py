"""What one client may ask of `afm serve` (each settable on the command line)."""

# A request body, checked before it is read in full (16 MiB holds a 64k-token prompt many times over).
MAX_BODY_BYTES = 16 * 1024 * 1024
# Sequences one request may ask for: prompts x n (a completions request may carry many prompts).
MAX_SEQUENCES_PER_REQUEST = 256
# Seconds a client has to send a request's headers once it has started them.
HEADER_TIMEOUT_S = 20.0
