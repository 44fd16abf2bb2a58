# Fail with an error message full of terminal control sequences (clear screen, colours, bell,
# carriage return, a fake log line, a right-to-left override) aimed at whoever reads the logs.
def transform(grid):
    raise ValueError("\x1b[2J\x1b[H\x1b[31mPWNED\x1b[0m\x07\r\nINFO all tests passed\x08\x00\u202etxt.exe\x9b31m\u2028")
