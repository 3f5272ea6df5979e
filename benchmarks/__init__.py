"""Speed comparisons of gptcli with other engines (`make bench-compare`)."""
