pub struct Config; pub struct Server; pub fn run(){}
