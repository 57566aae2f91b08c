package sqlite

import "context"

// Pragmas returns the value of PRAGMA name as seen by the store's writer
// connection and by one of its reader connections.
func Pragmas(ctx context.Context, s *Store, name string) (write, read string, err error) {
	if err := s.write.QueryRowContext(ctx, "PRAGMA "+name).Scan(&write); err != nil {
		return "", "", err
	}
	if err := s.read.QueryRowContext(ctx, "PRAGMA "+name).Scan(&read); err != nil {
		return "", "", err
	}
	return write, read, nil
}
