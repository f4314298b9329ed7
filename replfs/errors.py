"""The one error type a user sees.

Every refusal that reaches a user is a ReplfsError: a message that says
what and why, and the exit code the command ends with.  The CLIs print
the message without a traceback.  Exit-code classes follow drbdadm's so
that scripts written for DRBD keep working:

    1  usage            (bad command line)
    2  syntax           (config file does not parse)
    5  timed out        (wait-connect, wait-sync; also a disk that is
                         below Outdated already, as drbdsetup says)
    10 config           (config parses but is not valid for this node)
    11 state change     (generic state change refusal)
    16 no local disk
    17 no UpToDate disk
    20 exec / daemon    (the daemon is not there, or failed)
"""

EXIT_USAGE = 1
EXIT_SYNTAX = 2
EXIT_TIMEOUT = 5
EXIT_LOWER_THAN_OUTDATED = 5
EXIT_CONFIG = 10
EXIT_STATE = 11
EXIT_NO_LOCAL_DISK = 16
EXIT_NO_UPTODATE = 17
EXIT_EXEC = 20


class ReplfsError(Exception):
    """An error with a user-facing message and a process exit code."""

    def __init__(self, message: str, exit_code: int = EXIT_EXEC):
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message


class BlockDeviceError(OSError):
    """An I/O error from a block device; carries an errno like OSError.
    (Here, not in replfs.blockdev, so that the CLI can name it without
    importing trio; replfs.blockdev re-exports it.)"""
