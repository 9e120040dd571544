"""``python -m ps3.extract`` whose rank 1 is SIGKILLed right after its first shard is complete.

A deterministic crash for the resume test (run under torchrun): the kill leaves whatever the
other rank was writing half done, exactly as a lost node or an OOM kill would.
"""

import os
import signal

from ps3.extract import cli, shards

_close = shards.ShardWriter.close


def _close_then_die(self, info):
    _close(self, info)
    if os.environ.get("RANK") == "1":
        os.kill(os.getpid(), signal.SIGKILL)


shards.ShardWriter.close = _close_then_die
cli.main()
